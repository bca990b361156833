use super::*;
use http::Uri;

/// A call's future is kept (inside each queued call) for as long as the call waits,
/// so it must stay small: connecting is boxed (see `checkout`).
#[test]
fn a_call_future_stays_small() {
    let connections = WorkerConnections::new(Duration::from_secs(1), 1, &Egress::direct());
    let origin = Arc::new(Origin::of(&Uri::from_static("http://127.0.0.1:9/")).unwrap());
    let send = Arc::clone(&connections).send(
        Arc::clone(&origin),
        PathAndQuery::from_static("/"),
        Request::new(crate::http::body::empty()),
    );
    let size = std::mem::size_of_val(&send);
    assert!(size < 1024, "{size} bytes");
}

#[test]
fn host_carries_only_a_port_that_is_not_the_default() {
    let host = |uri: &'static str| Origin::of(&Uri::from_static(uri)).unwrap().host;
    assert_eq!(host("https://api.mypurecloud.com/"), "api.mypurecloud.com");
    assert_eq!(host("https://api.example.com:443/x"), "api.example.com");
    assert_eq!(host("http://127.0.0.1:8080/"), "127.0.0.1:8080");
    assert_eq!(host("http://h:80"), "h");
}

#[test]
fn paths_join_the_base_path() {
    let within = PathAndQuery::from_static("/api/v2/users?a=1");
    let root = Origin::of(&Uri::from_static("https://api.mypurecloud.com/")).unwrap();
    assert_eq!(root.path(&within).unwrap(), "/api/v2/users?a=1");
    let based = Origin::of(&Uri::from_static("http://127.0.0.1:9/base/")).unwrap();
    assert_eq!(based.path(&within).unwrap(), "/base/api/v2/users?a=1");
    assert_eq!(based.to_string(), "http://127.0.0.1:9/base");
}
