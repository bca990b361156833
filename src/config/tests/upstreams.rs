//! `[[upstream]]`: provider endpoints, egress, rate limits and route limits.

use super::*;

#[test]
fn genesys_region_sets_login_and_api_hosts() {
    let c = load(GENESYS).unwrap();
    let u = &c.upstreams[0];
    assert_eq!(
        u.grant.token_url.as_deref(),
        Some("https://login.mypurecloud.ie/oauth/token")
    );
    assert_eq!(
        u.base_url.as_ref().map(|b| b.to_string()).as_deref(),
        Some("https://api.mypurecloud.ie/")
    );
    assert_eq!(u.grant.client_id, "my-id");
    assert_eq!(u.prefix, "/");
}

#[test]
fn egress_proxy_comes_from_the_config_or_the_environment_and_never_shows_its_password() {
    let with_proxy = |url: &str| format!("[server]\negress_proxy = \"{url}\"\n{GENESYS}");
    let c = load(&with_proxy("http://corp:pw-77@proxy.corp:3128")).unwrap();
    let routes = c.server.egress.as_ref().unwrap();
    assert_eq!(
        routes.shown(true).as_deref(),
        Some("http://proxy.corp:3128")
    );
    let dbg = format!("{c:?}");
    assert!(
        !dbg.contains("pw-77") && dbg.contains("proxy.corp:3128"),
        "{dbg}"
    );
    for bad in [
        "https://corp:pw-77@proxy.corp:3128",
        "socks5://corp:pw-77@proxy.corp:1080",
        "http://",
    ] {
        let e = load(&with_proxy(bad)).unwrap_err().to_string();
        assert!(
            e.contains("server.egress_proxy") && !e.contains("pw-77"),
            "{e}"
        );
    }
    // A password with a character that ends the host part: the error says so, at the
    // proxy's key (it named ca_file once), without the password.
    for reserved in ["pw/77", "pw?77", "pw#77"] {
        let e = load(&with_proxy(&format!(
            "http://corp:{reserved}@proxy.corp:3128"
        )))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("server.egress_proxy")
                && e.contains("percent-encode")
                && !e.contains("ca_file")
                && !e.contains(reserved),
            "{e}"
        );
    }
    // Unset: the environment, as curl reads it; an upstream may opt out.
    let env = |name: &str| match name {
        "HTTPS_PROXY" => Some("http://u:pw-88@egress:8080".to_string()),
        "NO_PROXY" => Some("internal.example.com".to_string()),
        "ID" => Some("id".into()),
        "SECRET" => Some("s".into()),
        _ => None,
    };
    let c = Config::from_toml(GENESYS, Path::new("p.toml"), &env).unwrap();
    let routes = c.server.egress.as_ref().unwrap();
    assert_eq!(routes.shown(true).as_deref(), Some("http://egress:8080"));
    assert_eq!(routes.shown(false), None);
    assert_eq!(routes.no_proxy, "internal.example.com");
    assert!(c.upstreams[0].grant.egress.proxy.is_some());
    let text = GENESYS.replace(
        "provider = \"genesys\"",
        "provider = \"genesys\"\negress_proxy = \"none\"",
    );
    let c = Config::from_toml(&text, Path::new("p.toml"), &env).unwrap();
    assert!(c.upstreams[0].grant.egress.proxy.is_none());
    let text = GENESYS.replace(
        "provider = \"genesys\"",
        "provider = \"genesys\"\negress_proxy = \"http://x:1\"",
    );
    let e = load(&text).unwrap_err().to_string();
    assert!(e.contains("egress_proxy") && e.contains("\"none\""), "{e}");
    let bad_env = |name: &str| {
        (name == "HTTPS_PROXY")
            .then(|| "ftp://u:pw-99@x".to_string())
            .or_else(|| env(name))
    };
    let e = Config::from_toml(GENESYS, Path::new("p.toml"), &bad_env)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTPS_PROXY") && !e.contains("pw-99"), "{e}");
}

#[test]
fn rate_limits_and_shares_are_read_and_checked() {
    let with = |line: &str| GENESYS.replace("client_id", &format!("{line}\nclient_id"));
    for (text, calls, secs) in [
        ("300/min", 300, 60),
        ("60/10s", 60, 10),
        ("5/s", 5, 1),
        ("1000/hour", 1000, 3600),
    ] {
        let c = load(&with(&format!("rate_limit = \"{text}\""))).unwrap();
        let r = c.upstreams[0].rate_limit.unwrap();
        assert_eq!((r.calls, r.window.as_secs()), (calls, secs), "{text}");
        assert_eq!(
            c.upstreams[0].rate_limit_max_wait,
            std::time::Duration::from_secs(10)
        );
    }
    for bad in ["300", "0/min", "300/fortnight", "x/min", "5/0s"] {
        let e = load(&with(&format!("rate_limit = \"{bad}\"")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rate_limit") && e.contains("300/min"), "{e}");
    }
    let client = |extra: &str| {
        load(&format!(
            "{GENESYS}\n[[client]]\nname = \"c\"\nkey_sha256 = \"{}\"\n{extra}\n",
            "ab".repeat(32)
        ))
    };
    let c = client("share = 3\nmax_per_minute = 100").unwrap();
    assert_eq!(
        (c.clients[0].share, c.clients[0].max_per_minute),
        (3, Some(100))
    );
    assert_eq!(client("").unwrap().clients[0].share, 1);
    for (extra, key) in [
        ("share = 0", "share"),
        ("max_per_minute = 0", "max_per_minute"),
    ] {
        let e = client(extra).unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
}

#[test]
fn route_limits_and_channel_shares_are_read_and_checked() {
    let routed = |route: &str, rate: &str| {
        load(&format!(
            "{GENESYS}\n[[upstream.route_limit]]\nroute = \"{route}\"\nrate = \"{rate}\"\n"
        ))
    };
    let c = routed("PUT /api/v2/architect/ivrs/*", "100/min").unwrap();
    let r = &c.upstreams[0].route_limits[0];
    assert_eq!((r.rate.calls, r.rate.window.as_secs()), (100, 60));
    assert!(r
        .rule
        .allows(&http::Method::PUT, "/api/v2/architect/ivrs/42"));
    assert!(!r
        .rule
        .allows(&http::Method::GET, "/api/v2/architect/ivrs/42"));
    let e = routed("PUT /api/v2/x", "100/fortnight")
        .unwrap_err()
        .to_string();
    assert!(e.contains("route_limit[0].rate"), "{e}");
    let e = routed("PUT", "100/min").unwrap_err().to_string();
    assert!(e.contains("route_limit[0].route"), "{e}");

    // Genesys holds 20 channels per OAuth client; by default the clients split them.
    let c = load(&format!(
        "{GENESYS}\n[[client]]\nname = \"a\"\nkey_sha256 = \"{}\"\n[[client]]\nname = \"b\"\nkey_sha256 = \"{}\"\nmax_channels = 3\n[[client]]\nname = \"c\"\nkey_sha256 = \"{}\"\n",
        "ab".repeat(32),
        "cd".repeat(32),
        "ef".repeat(32)
    ))
    .unwrap();
    let u = &c.upstreams[0];
    assert_eq!(u.notification_channels, Some(20));
    let shares: Vec<_> = c.clients.iter().map(|k| c.channel_share(u, k)).collect();
    assert_eq!(shares, [Some(6), Some(3), Some(6)]);
    let e = load(&GENESYS.replace("client_id", "notification_channels = 0\nclient_id"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("notification_channels"), "{e}");
}
