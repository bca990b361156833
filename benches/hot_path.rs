//! Criterion benchmarks of the request path's hot spots. The end-to-end load comparison
//! against nginx and haproxy is a separate script (it needs those programs).
//!
//! `cargo bench --bench hot_path`

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use tokengate::config::Config;
use tokengate::forward::strip_hop_by_hop;
use tokengate::metrics::Metrics;
use tokengate::policy::AllowRule;
use tokengate::sandbox::{Sandbox, SandboxOptions};
use tokengate::token::grant::{side_call_client, Granter};
use tokengate::token::TokenSource;

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
        let granter = Granter::new(side_call_client(), config.upstreams[0].grant.clone());
        let tokens = TokenSource::new(Arc::from("s"), granter, Metrics::new(), Default::default(), None);
        tokens.token().await.unwrap();
        std::mem::forget(sandbox); // keep it serving for the rest of the run
        tokens
    });
    c.bench_function("token cache hit", |b| {
        b.to_async(&rt)
            .iter(|| async { tokens.token().await.unwrap().generation })
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

criterion_group!(benches, token_cache_hit, header_rewrite, policy_match);
criterion_main!(benches);
