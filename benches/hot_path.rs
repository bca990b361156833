//! Criterion benchmarks of the request path's hot spots. The end-to-end load comparison
//! against nginx and haproxy is a separate script (it needs those programs).
//!
//! `cargo bench --bench hot_path`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;
use tokengate::back::forward::strip_hop_by_hop;
use tokengate::config::policy::AllowRule;
use tokengate::config::Config;
use tokengate::front::session::Sessions;
use tokengate::telemetry::board::StatusBoard;
use tokengate::telemetry::metrics::Metrics;
use tokengate::token::grant::Granter;
use tokengate::token::TokenSource;
use tokengate::upstream::Upstream;
use tokengate_sandbox::{Sandbox, SandboxOptions};
use tower::ServiceExt;

fn token_cache_hit(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let tokens = rt.block_on(async {
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let text = format!(
            "[[upstream]]\nname = \"s\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nbase_url = \"{}\"\nclient_id = \"sandbox-client\"\nclient_secret = \"sandbox-secret\"\n",
            sandbox.token_url(),
            sandbox.api_url()
        );
        let config = Config::from_toml(&text, "bench.toml".as_ref(), &|_| None).unwrap();
        let granter = Granter::new(config.upstreams[0].grant.clone());
        let tokens = TokenSource::new(Arc::from("s"), granter, Metrics::new(), Default::default(), Default::default());
        tokens.token().await.unwrap();
        std::mem::forget(sandbox); // keep it serving for the rest of the run
        tokens
    });
    c.bench_function("token cache hit", |b| {
        b.to_async(&rt)
            .iter(|| async { tokens.token().await.unwrap().generation })
    });
}

/// One GET through every layer of the in-process tower stack (client key check, routing,
/// token, retry bookkeeping, forwarding) to the sandbox's API host on loopback, answer
/// body read. On one current-thread runtime, as a worker runs it.
fn whole_stack(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = "tg_bench-client-key-0123456789abcdef";
    let service = rt.block_on(async {
        let sandbox = Sandbox::start(SandboxOptions::default()).await.unwrap();
        let text = format!(
            "[[upstream]]\nname = \"s\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nbase_url = \"{}\"\nclient_id = \"sandbox-client\"\nclient_secret = \"sandbox-secret\"\n[[client]]\nname = \"bench\"\nkey_sha256 = \"{}\"\n",
            sandbox.token_url(),
            sandbox.api_url(),
            tokengate::front::keys::hash_key(key)
        );
        let config = Config::from_toml(&text, "bench.toml".as_ref(), &|_| None).unwrap();
        let metrics = Metrics::new();
        let granter = Granter::new(config.upstreams[0].grant.clone());
        let tokens = TokenSource::new(Arc::from("s"), granter, metrics.clone(), Default::default(), Default::default());
        tokens.token().await.unwrap();
        let upstream = Arc::new(Upstream::new(
            Arc::clone(&config.upstreams[0]),
            vec![tokens],
            1,
            metrics.for_upstream("s"),
            None,
            None,
        ));
        let board = Arc::new(StatusBoard::new(config.upstreams.iter().map(|u| &u.name), &config.clients, Default::default()));
        let sessions = Arc::new(Sessions::new());
        let sockets = tokengate::back::websocket::Sockets::new(metrics.clone());
        std::mem::forget(sandbox); // keep it serving for the rest of the run
        let parts = tokengate::stack::Parts {
            config: &config,
            upstreams: &[upstream],
            metrics: &metrics,
            board: &board,
            sessions: &sessions,
            sockets: &sockets,
            channels: &tokengate::back::notifications::Channels::new(Default::default(), metrics.clone()),
        };
        tokengate::stack::request_path(&parts, 0)
    });
    c.bench_function("one GET through the whole stack", |b| {
        b.to_async(&rt).iter(|| {
            let service = service.clone();
            async move {
                let req = http::Request::get("/api/v2/users/me")
                    .header("authorization", format!("Bearer {key}"))
                    .body(tokengate::http::body::empty())
                    .unwrap();
                let resp = service.oneshot(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap().to_bytes().len()
            }
        })
    });
}

fn header_rewrite(c: &mut Criterion) {
    let mut template = HeaderMap::new();
    for (k, v) in [
        ("host", "127.0.0.1:8080"),
        ("user-agent", "legacy-etl/1.0"),
        ("accept", "application/json"),
        ("content-type", "application/json"),
        ("connection", "keep-alive"),
        ("authorization", "Bearer tg_0123456789abcdef"),
    ] {
        template.insert(k, HeaderValue::from_static(v));
    }
    c.bench_function("strip hop-by-hop headers", |b| {
        b.iter_batched(
            || template.clone(),
            |mut h| {
                strip_hop_by_hop(&mut h);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

fn policy_match(c: &mut Criterion) {
    let rule = AllowRule::parse("GET /api/v2/analytics/**").unwrap();
    c.bench_function("allow rule match", |b| {
        b.iter(|| {
            rule.allows(
                &Method::GET,
                "/api/v2/analytics/conversations/details/jobs/123",
            )
        })
    });
}

criterion_group!(
    benches,
    token_cache_hit,
    whole_stack,
    header_rewrite,
    policy_match
);
criterion_main!(benches);
