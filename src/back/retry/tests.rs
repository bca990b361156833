use std::sync::{Arc, Mutex};

use http::StatusCode;
use http_body_util::BodyExt;
use tower::{service_fn, ServiceExt};

use super::*;
use crate::call::messages::ReplaceToken;
use crate::call::outcome::{Outcome, RetryReason, TokenId};
use crate::config::Config;

/// A body that sends `chunks` one frame at a time, with no declared length.
fn chunked(chunks: &[&'static [u8]]) -> ProxyBody {
    let frames: Vec<Result<http_body::Frame<Bytes>, BoxError>> = chunks
        .iter()
        .map(|c| Ok(http_body::Frame::data(Bytes::from_static(c))))
        .collect();
    body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

async fn bytes_of(kept: Kept) -> (bool, Bytes) {
    match kept {
        Kept::Whole(bytes, _) => (true, bytes),
        Kept::Streaming(body) => (false, body.collect().await.unwrap().to_bytes()),
    }
}

#[tokio::test]
async fn a_body_of_exactly_the_limit_is_kept_and_one_byte_more_streams_whole() {
    let (kept, bytes) = bytes_of(keep_body(body::full("12345"), Some(5), 5).await.unwrap()).await;
    assert!(kept);
    assert_eq!(bytes, "12345");
    let (kept, bytes) = bytes_of(keep_body(body::full("123456"), Some(6), 5).await.unwrap()).await;
    assert!(!kept, "a declared length over the limit is not read at all");
    assert_eq!(bytes, "123456");
}

#[tokio::test]
async fn a_body_growing_past_the_limit_mid_read_streams_every_byte_in_order() {
    let grown = chunked(&[b"abc", b"def", b"ghi"]);
    let (kept, bytes) = bytes_of(keep_body(grown, None, 5).await.unwrap()).await;
    assert!(!kept);
    assert_eq!(bytes, "abcdefghi");
    let (kept, bytes) = bytes_of(keep_body(chunked(&[b"ab", b"cd"]), None, 4).await.unwrap()).await;
    assert!(kept, "exactly the limit, undeclared");
    assert_eq!(bytes, "abcd");
}

fn upstream() -> Arc<UpstreamConfig> {
    let toml = "[[upstream]]\nname = \"u\"\nprovider = \"oauth2\"\ntoken_url = \"http://127.0.0.1:1/t\"\nbase_url = \"http://127.0.0.1:1\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";
    let config = Config::from_toml(toml, "t.toml".as_ref(), &|_| None).unwrap();
    Arc::clone(&config.upstreams[0])
}

/// What the inner service saw of each attempt: the body and the token to replace.
type Seen = Arc<Mutex<Vec<(Bytes, Option<u64>)>>>;

/// An inner service that answers each attempt with the next of `statuses`, as an
/// upstream would (its answer names the token it was made with), or as the proxy
/// itself would when `from_upstream` is false.
fn inner(
    statuses: Vec<u16>,
    from_upstream: bool,
    seen: Seen,
) -> impl Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
       + Clone
       + Send
       + 'static {
    let statuses = Arc::new(Mutex::new(statuses.into_iter()));
    service_fn(move |req: ProxyRequest| {
        let (statuses, seen) = (Arc::clone(&statuses), Arc::clone(&seen));
        Box::pin(async move {
            let replace = req
                .extensions()
                .get::<ReplaceToken>()
                .map(|r| r.rejected.generation);
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let attempt = {
                let mut seen = seen.lock().unwrap();
                seen.push((body, replace));
                seen.len() as u64
            };
            let status = statuses.lock().unwrap().next().unwrap_or(200);
            let mut resp = http::Response::new(body::empty());
            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
            if from_upstream {
                Outcome::of(&mut resp).token = Some(TokenId {
                    pool_index: 0,
                    generation: attempt,
                });
            } else {
                Outcome::of(&mut resp).error = Some(crate::http::codes::ErrorCode::Unauthorized);
            }
            Ok(resp)
        }) as BoxFuture
    })
}

fn put(body: &'static str) -> ProxyRequest {
    Request::put("/x").body(body::full(body)).unwrap()
}

#[tokio::test]
async fn a_401_from_the_upstream_is_sent_again_with_the_same_body_asking_for_another_token() {
    let seen = Seen::default();
    let layer = RetryLayer::for_upstream(&upstream(), 1024, Metrics::new());
    let mut retry = layer.layer(inner(vec![401, 200], true, Arc::clone(&seen)));
    let resp = retry
        .ready()
        .await
        .unwrap()
        .call(put("payload"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        Outcome::read(&resp).and_then(|o| o.retried),
        Some(RetryReason::Unauthorized)
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0], (Bytes::from("payload"), None));
    // The second attempt names the token the upstream rejected (generation 1).
    assert_eq!(seen[1], (Bytes::from("payload"), Some(1)));
}

#[tokio::test]
async fn a_second_401_and_a_401_the_proxy_made_go_back_unchanged() {
    let seen = Seen::default();
    let layer = RetryLayer::for_upstream(&upstream(), 1024, Metrics::new());
    let mut retry = layer.layer(inner(vec![401, 401, 401], true, Arc::clone(&seen)));
    let resp = retry.ready().await.unwrap().call(put("p")).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(seen.lock().unwrap().len(), 2, "one retry, never two");

    let seen = Seen::default();
    let mut retry = layer.layer(inner(vec![401], false, Arc::clone(&seen)));
    let resp = retry.ready().await.unwrap().call(put("p")).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "no token was rejected: nothing to retry"
    );
}

/// Every call's future is allocated once and copied into its box, and every call in
/// flight holds it: 424 bytes, where an `async fn` keeping the same state twice made
/// 1,000 (see docs/testing.md, issue 13).
#[test]
fn a_calls_future_fits_the_allocators_thread_cache() {
    let layer = RetryLayer::for_upstream(&upstream(), 1024, Metrics::new());
    let mut retry = layer.layer(inner(vec![], true, Seen::default()));
    let call = retry.call(Request::get("/x").body(body::empty()).unwrap());
    let size = std::mem::size_of_val(&*call);
    assert!(size <= 512, "{size} bytes");
}

#[tokio::test]
async fn a_body_over_the_limit_goes_once_and_its_401_is_not_retried() {
    let seen = Seen::default();
    let layer = RetryLayer::for_upstream(&upstream(), 4, Metrics::new());
    let mut retry = layer.layer(inner(vec![401, 200], true, Arc::clone(&seen)));
    let resp = retry
        .ready()
        .await
        .unwrap()
        .call(put("12345"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        seen.lock().unwrap().clone(),
        vec![(Bytes::from("12345"), None)]
    );
}
