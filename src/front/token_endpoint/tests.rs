use super::*;
use base64::Engine as _;
use sha2::{Digest, Sha256};
use tower::ServiceExt;

const KEY: &str = "tg_unit-test-key";

fn endpoint() -> TokenEndpoint<
    impl Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future: Send> + Clone,
> {
    let client = Arc::new(ClientConfig {
        name: "job".into(),
        keys: vec![crate::config::ClientKey::of_hash(
            Sha256::digest(KEY.as_bytes()).into(),
        )],
        upstreams: None,
        allow: None,
        share: 1,
        max_per_minute: None,
        max_channels: None,
        jwt: None,
    });
    // Whatever is not a token request reaches the service behind: a 299 says so.
    let behind = tower::service_fn(|_req: ProxyRequest| async {
        let mut resp = http::Response::new(body::empty());
        *resp.status_mut() = StatusCode::from_u16(299).unwrap();
        Ok::<_, Infallible>(resp)
    });
    TokenEndpointLayer::answering_at(
        &["/oauth/token".to_string()],
        &[client],
        Arc::new(Sessions::new()),
        Duration::from_secs(60),
    )
    .layer(behind)
}

fn token_request(basic: Option<(&str, &str)>, form: &str, peer: [u8; 4]) -> ProxyRequest {
    let mut req = http::Request::post("/oauth/token")
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some((id, secret)) = basic {
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"));
        req = req.header(header::AUTHORIZATION, format!("Basic {pair}"));
    }
    let mut req = req.body(body::full(form.to_string())).unwrap();
    req.extensions_mut()
        .insert(PeerAddr(std::net::IpAddr::from(peer)));
    req
}

async fn json_of(resp: ProxyResponse) -> serde_json::Value {
    use http_body_util::BodyExt;
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test]
async fn a_client_gets_a_session_token_and_others_an_oauth_error() {
    let form = "grant_type=client_credentials";
    let ok = endpoint()
        .oneshot(token_request(Some(("job", KEY)), form, [10, 1, 0, 1]))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let body = json_of(ok).await;
    assert_eq!(body["token_type"], "bearer");
    assert!(Sessions::is_session(
        body["access_token"].as_str().unwrap().as_bytes()
    ));
    // The form's credentials do as well (client_secret_post).
    let post = format!("{form}&client_id=job&client_secret={KEY}");
    let ok = endpoint()
        .oneshot(token_request(None, &post, [10, 1, 0, 2]))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let wrong = endpoint()
        .oneshot(token_request(
            Some(("job", "tg_wrong")),
            form,
            [10, 1, 0, 3],
        ))
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(json_of(wrong).await["error"], "invalid_client");
    let grant = endpoint()
        .oneshot(token_request(
            Some(("job", KEY)),
            "grant_type=password",
            [10, 1, 0, 4],
        ))
        .await
        .unwrap();
    assert_eq!(json_of(grant).await["error"], "unsupported_grant_type");
    // Other paths pass through.
    let other = http::Request::get("/api/v2/users/me")
        .body(body::empty())
        .unwrap();
    assert_eq!(endpoint().oneshot(other).await.unwrap().status(), 299);
}

#[tokio::test]
async fn an_address_that_guessed_wrong_ten_times_is_told_to_slow_down() {
    let form = "grant_type=client_credentials";
    let peer = [10, 2, 0, 1];
    for _ in 0..10 {
        let r = endpoint()
            .oneshot(token_request(Some(("job", "tg_guess")), form, peer))
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let slowed = endpoint()
        .oneshot(token_request(Some(("job", KEY)), form, peer))
        .await
        .unwrap();
    assert_eq!(slowed.status(), 429);
    assert_eq!(json_of(slowed).await["error"], "slow_down");
    // Another address is not.
    let other = endpoint()
        .oneshot(token_request(Some(("job", KEY)), form, [10, 2, 0, 2]))
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
}
