use super::*;
use secrecy::ExposeSecret;

fn env(name: &str) -> Option<String> {
    match name {
        "ID" => Some("my-id".into()),
        "SECRET" => Some("super-secret-value".into()),
        _ => None,
    }
}

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("proxy.toml"), &env)
}

const GENESYS: &str = r#"
[[upstream]]
name = "genesys"
provider = "genesys"
region = "eu_west_1"
client_id = "${ID}"
client_secret = "${SECRET}"
"#;

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
fn unknown_key_is_an_error_naming_it() {
    let err = load(&format!("{GENESYS}\nclient_secrte = \"x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("proxy.toml: "), "{err}");
    assert!(err.contains("client_secrte"), "{err}");
    assert!(err.contains("line"), "{err}");
}

#[test]
fn missing_variable_is_named_and_no_secret_is_printed() {
    let text = GENESYS.replace("${ID}", "${NOPE}");
    let err = load(&text).unwrap_err().to_string();
    assert!(
        err.contains("environment variable NOPE is not set"),
        "{err}"
    );
    assert!(err.contains("upstream \"genesys\".client_id"), "{err}");
    let dbg = format!("{:?}", load(GENESYS).unwrap());
    assert!(!dbg.contains("super-secret-value"), "{dbg}");
}

#[test]
fn every_missing_variable_is_named_in_one_error() {
    let text = format!(
        "[server]\npublic_url = \"${{PUBLIC}}\"\n{}\n[cache]\nredis_url = \"${{R_URL}}\"\nencryption_key = \"${{R_KEY}}\"\n",
        GENESYS
            .replace("${ID}", "${A_ID}")
            .replace("client_id", "scope = \"${A_SCOPE} x $$ ${A_SCOPE}\"\ntoken_params = { audience = \"${A_AUD}\" }\nclient_id")
    );
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("6 environment variables are not set"), "{err}");
    for (name, key) in [
        ("A_ID", "upstream \"genesys\".client_id"),
        ("A_SCOPE", "upstream \"genesys\".scope"),
        ("A_AUD", "upstream \"genesys\".token_params.audience"),
        ("R_URL", "cache.redis_url"),
        ("R_KEY", "cache.encryption_key"),
        ("PUBLIC", "server.public_url"),
    ] {
        assert!(err.contains(&format!("{name} ({key})")), "{name}: {err}");
    }
}

#[test]
fn allow_rules_that_could_never_match_are_refused_naming_the_rule() {
    for (rule, says) in [
        ("get /api/v2/users/**", "upper-case"),
        ("GETT /api/v2/users", "not a method"),
        ("GET /api/v2/routing/queues/{queueId}", "written *"),
        ("GET /api/v2/groups/**?x=1", "leave out the query"),
    ] {
        let text = format!(
            "{GENESYS}\n[[client]]\nname = \"c\"\nkey_sha256 = \"{}\"\nallow = [\"GET /ok\", \"{rule}\"]\n",
            "ab".repeat(32)
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("client \"c\".allow[1]"), "{err}");
        assert!(err.contains(rule) && err.contains(says), "{err}");
    }
}

#[test]
fn a_misspelt_key_or_region_gets_the_nearest_name() {
    let err = load(&GENESYS.replace("region", "regoin"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean `region`?"), "{err}");
    let err = load(&GENESYS.replace("eu_west_1", "eu_wset_1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("did you mean \"eu_west_1\"?"), "{err}");
    let c = load(&GENESYS.replace("eu_west_1", "mypurecloud.ie")).unwrap();
    assert_eq!(c.upstreams[0].region.map(|r| r.name), Some("eu_west_1"));
}

#[test]
fn an_unquoted_text_value_is_told_to_go_in_quotes() {
    let err = load(&format!("[server]\nlisten = 127.0.0.1:8088\n{GENESYS}"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 2") && err.contains("listen = \"…\""),
        "{err}"
    );
    // A secret typed without quotes is not printed.
    let err = load(&GENESYS.replace("\"${SECRET}\"", "s3cr3t-Value!"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("s3cr3t"), "{err}");
}

#[test]
fn unknown_region_lists_the_valid_ones() {
    let err = load(&GENESYS.replace("eu_west_1", "us-east-9"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("us-east-9") && err.contains("mx_central_1"),
        "{err}"
    );
}

#[test]
fn toml_errors_name_the_place_and_never_quote_a_secret() {
    let secret = "Zq8!x-very-secret";
    for (text, key) in [
        (format!("[[upstream]]\nname = \"a\"\nclient_secret = \"{secret}\nprovider = \"genesys\"\n"), None),
        (format!("[[upstream]]\nname = \"a\"\ntokens = \"{secret}\"\n"), Some("tokens")),
        (format!("[[upstream]]\nname = \"a\"\nmax_connections = 987654321987654321987\nclient_secret = \"{secret}\"\n"), None),
        (format!("[[upstream]]\nname = \"a\"\nclient_secret = \"{secret}\" x\n"), None),
    ] {
        let err = Config::from_toml(&text, "p.toml".as_ref(), &|_| None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains(secret) && !err.contains("Zq8"), "{err}");
        assert!(err.starts_with("p.toml: line "), "{err}");
        if let Some(key) = key {
            assert!(err.contains(&format!("key `{key}`")), "{err}");
        }
    }
}

#[test]
fn anonymous_on_a_public_address_is_refused() {
    let text = format!("[server]\nlisten = \"0.0.0.0:8080\"\n{GENESYS}");
    let err = load(&text).unwrap_err().to_string();
    assert!(err.contains("allow_anonymous"), "{err}");
    let ok = format!("[server]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n{GENESYS}");
    assert!(load(&ok).is_ok());
}

#[test]
fn cache_takes_hex_or_base64_keys_and_names_bad_values_without_secrets() {
    let cache = |url: &str, key: &str| {
        load(&format!(
            "{GENESYS}\n[cache]\nredis_url = \"{url}\"\nencryption_key = \"{key}\"\n"
        ))
    };
    let hex_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let b64_key = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
    let a = cache("redis://:pw-123@10.0.0.5:6379/2", hex_key).unwrap();
    let b = cache("redis://:pw-123@10.0.0.5:6379/2", b64_key).unwrap();
    let (a, b) = (a.cache.unwrap(), b.cache.unwrap());
    assert!(a.same_as(&b), "the same 32 bytes either way");
    assert_eq!(a.redis_target, "10.0.0.5:6379");
    assert_eq!(a.key_prefix, "tokengate");
    let dbg = format!("{a:?}");
    assert!(
        !dbg.contains("pw-123") && !dbg.contains("0011223344"),
        "{dbg}"
    );

    let short = cache("redis://h:6379", "abcd").unwrap_err().to_string();
    assert!(
        short.contains("cache.encryption_key") && short.contains("32 bytes"),
        "{short}"
    );
    assert!(!short.contains("abcd"), "{short}");
    let bad_url = cache("http://:pw-123@h:6379", hex_key)
        .unwrap_err()
        .to_string();
    assert!(bad_url.contains("cache.redis_url"), "{bad_url}");
    assert!(!bad_url.contains("pw-123"), "{bad_url}");
    let missing = load(&format!("{GENESYS}\n[cache]\nredis_url = \"redis://h\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.contains("cache.encryption_key") && missing.contains("required"),
        "{missing}"
    );
}

#[test]
fn cache_key_changes_with_the_secret() {
    let a = load(GENESYS).unwrap().upstreams[0].grant.cache_key();
    let b = load(&GENESYS.replace("${SECRET}", "other"))
        .unwrap()
        .upstreams[0]
        .grant
        .cache_key();
    assert_ne!(a, b);
}

#[test]
fn interpolation_handles_dollars() {
    let text = GENESYS.replace("${SECRET}", "a$$b$c${SECRET}");
    let c = load(&text).unwrap();
    assert_eq!(
        c.upstreams[0]
            .grant
            .client_secret
            .as_ref()
            .unwrap()
            .value
            .expose_secret(),
        "a$b$csuper-secret-value"
    );
}

#[test]
fn closed_sets_of_words_name_the_key_and_the_accepted_values() {
    let with = |line: &str| {
        GENESYS.replace(
            "client_id = \"${ID}\"",
            &format!("client_id = \"${{ID}}\"\n{line}"),
        )
    };
    for (line, key, accepted) in [
        ("auth_method = \"bearer\"", "auth_method", "`basic`"),
        ("basic_encoding = \"url\"", "basic_encoding", "`form`"),
    ] {
        let e = load(&with(line)).unwrap_err().to_string();
        assert!(
            e.contains(&format!("key `{key}`")) && e.contains(accepted),
            "{e}"
        );
    }
    let e = load(&GENESYS.replace("provider = \"genesys\"", "provider = \"genesis\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `provider`") && e.contains("`cxone`"), "{e}");
    let e = load(&format!("[log]\nformat = \"xml\"\n{GENESYS}"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("key `format`") && e.contains("`json`"), "{e}");
    // The aliases the OAuth specs use are accepted.
    let c = load(&with(
        "auth_method = \"client_secret_post\"\nbasic_encoding = \"form\"",
    ))
    .unwrap();
    assert_eq!(c.upstreams[0].grant.auth_method, AuthMethod::Post);
    assert_eq!(
        c.upstreams[0].grant.basic_encoding,
        BasicEncoding::FormEncoded
    );
}

const OAUTH2: &str = r#"
[[upstream]]
name = "idp"
provider = "oauth2"
token_url = "https://idp.example.com/token"
base_url = "https://api.example.com"
client_id = "${ID}"
"#;

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
fn client_authentication_keys_are_checked_together() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_file = dir.path().join("k.pem");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let k = key_file.display();
    let cases: Vec<(String, &str)> = vec![
        // Genesys and CXone take secrets only.
        (GENESYS.replace("client_secret = \"${SECRET}\"", &format!("auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"")), "only valid for provider = \"oauth2\""),
        (format!("{OAUTH2}auth_method = \"private_key_jwt\"\n"), "private_key_file: is required"),
        (format!("{OAUTH2}auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"\nsigning_alg = \"RS256\"\n"), "not a PEM RSA private key"),
        (format!("{OAUTH2}auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"\nclient_secret = \"s\"\n"), "client_secret: is not used"),
        (format!("{OAUTH2}client_secret = \"s\"\nkey_id = \"k1\"\n"), "key_id: is only used with auth_method = \"private_key_jwt\""),
        (format!("{OAUTH2}auth_method = \"tls_client_auth\"\n"), "client_cert_file: is required"),
        (format!("{OAUTH2}client_secret = \"s\"\nclient_cert_file = \"{k}\"\n"), "set both client_cert_file and client_key_file"),
        (format!("{OAUTH2}client_secret = \"s\"\nca_only = true\n"), "ca_only: needs ca_file"),
        (format!("{OAUTH2}client_secret = \"s\"\nca_file = \"{k}\"\n"), "holds no PEM certificate"),
        ("[[upstream]]\nname = \"idp\"\nprovider = \"oauth2\"\nbase_url = \"https://api.example.com\"\nclient_id = \"x\"\nclient_secret = \"s\"\n".to_string(), "or issuer, to find it by discovery"),
        (GENESYS.replace("client_id", "issuer = \"https://x\"\nclient_id"), "only valid for provider = \"cxone\" or \"oauth2\""),
    ];
    for (text, expected) in cases {
        let e = load(&text).unwrap_err().to_string();
        assert!(e.contains(expected), "{expected:?} not in: {e}");
    }
    let ok = load(&format!(
        "{OAUTH2}auth_method = \"private_key_jwt\"\nprivate_key_file = \"{k}\"\nsigning_alg = \"ES256\"\nkey_id = \"k1\"\n"
    ))
    .unwrap();
    let g = &ok.upstreams[0].grant;
    assert_eq!(g.auth_method, AuthMethod::PrivateKeyJwt);
    assert!(g.client_secret.is_none());
    let issuer = load(&OAUTH2.replace(
        "token_url = \"https://idp.example.com/token\"",
        "issuer = \"https://idp.example.com/t1/\"\nclient_secret = \"s\"",
    ))
    .unwrap();
    assert_eq!(issuer.upstreams[0].grant.token_url, None);
    assert_eq!(
        issuer.upstreams[0].grant.issuer.as_deref(),
        Some("https://idp.example.com/t1")
    );
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

#[test]
fn cache_takes_sentinels_with_a_master_name_instead_of_a_url() {
    let key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let cache = |lines: &str| {
        load(&format!(
            "{GENESYS}\n[cache]\nencryption_key = \"{key}\"\n{lines}\n"
        ))
    };
    let c = cache("sentinels = [\"10.0.0.1:26379\", \"redis://:pw-sent@10.0.0.2:26379\"]\nmaster_name = \"fleet\"")
        .unwrap()
        .cache
        .unwrap();
    assert_eq!(
        c.redis_target,
        "sentinel fleet via 10.0.0.1:26379,10.0.0.2:26379"
    );
    assert!(
        matches!(&c.redis, RedisTarget::Sentinel { sentinels, master_name } if sentinels.len() == 2 && master_name == "fleet")
    );
    assert!(!format!("{c:?}").contains("pw-sent"));
    for (lines, expected) in [
        (
            "sentinels = [\"h:26379\"]",
            "cache.master_name: is required",
        ),
        ("sentinels = []\nmaster_name = \"m\"", "lists no sentinel"),
        (
            "sentinels = [\"h:26379\"]\nmaster_name = \"m\"\nredis_url = \"redis://h\"",
            "not both",
        ),
        (
            "redis_url = \"redis://h\"\nmaster_name = \"m\"",
            "is used with sentinels only",
        ),
        (
            "sentinels = [\"ftp://:pw-x@h\"]\nmaster_name = \"m\"",
            "cache.sentinels[0]",
        ),
    ] {
        let e = cache(lines).unwrap_err().to_string();
        assert!(
            e.contains(expected) && !e.contains("pw-x"),
            "{expected:?} not in {e}"
        );
    }
}

#[test]
fn telemetry_is_off_by_default_and_its_keys_are_checked() {
    assert!(load(GENESYS).unwrap().telemetry.is_none());
    let on = load(&format!(
        "{GENESYS}\n[telemetry]\notlp_endpoint = \"http://collector:4318\"\nheaders = {{ authorization = \"${{SECRET}}\" }}\n"
    ))
    .unwrap();
    let t = on.telemetry.unwrap();
    assert_eq!(t.endpoint.to_string(), "http://collector:4318/v1/traces");
    assert_eq!(
        (t.service_name.as_str(), t.sample_ratio),
        ("tokengate", 1.0)
    );
    assert!(!format!("{t:?}").contains("super-secret-value"));
    let as_given = load(&format!(
        "{GENESYS}\n[telemetry]\notlp_endpoint = \"https://c.example/otlp/v1/traces\"\n"
    ))
    .unwrap();
    assert_eq!(
        as_given.telemetry.unwrap().endpoint.to_string(),
        "https://c.example/otlp/v1/traces"
    );
    for (extra, says) in [
        ("sample_ratio = 0.5", "otlp_endpoint: is required"),
        (
            "otlp_endpoint = \"http://c:4318\"\nsample_ratio = 2.0",
            "sample_ratio",
        ),
        ("otlp_endpoint = \"ftp://c\"", "otlp_endpoint"),
        (
            "otlp_endpoint = \"http://c:4318\"\nsampling = 1",
            "unknown field",
        ),
    ] {
        let e = load(&format!("{GENESYS}\n[telemetry]\n{extra}\n")).unwrap_err();
        assert!(e.to_string().contains(says), "{extra}: {e}");
    }
}

#[test]
fn client_keys_have_a_lifecycle() {
    let client = |keys: &str| load(&format!("{GENESYS}\n[[client]]\nname = \"c\"\n{keys}\n"));
    let (a, b) = ("ab".repeat(32), "cd".repeat(32));
    // Both forms of a moment: TOML's own and a string.
    let c = client(&format!(
        "key_sha256 = \"{a}\"\nkeys = [{{ sha256 = \"{b}\", not_after = 2027-03-01T00:00:00Z }}, {{ sha256 = \"{}\", not_after = \"2027-04-01T12:00:00+02:00\" }}]",
        "ef".repeat(32)
    ))
    .unwrap();
    let keys = &c.clients[0].keys;
    assert_eq!(keys.len(), 3);
    assert_eq!(keys[0].not_after, None);
    assert_eq!(
        keys[1].not_after.map(crate::config::rfc3339).as_deref(),
        Some("2027-03-01T00:00:00Z")
    );
    assert_eq!(keys[1].fingerprint(), "sha256:cdcdcdcd");
    assert!(keys[2].not_after.is_some());
    // No key at all, a moment without its offset, one key twice: each named.
    let e = client("").unwrap_err().to_string();
    assert!(e.contains("key_sha256") && e.contains("keys"), "{e}");
    let e = client(&format!(
        "keys = [{{ sha256 = \"{a}\", not_after = \"2027-03-01\" }}]"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("keys[0].not_after"), "{e}");
    let e = client(&format!(
        "key_sha256 = \"{a}\"\nkeys = [{{ sha256 = \"{a}\" }}]"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("keys[0].sha256"), "{e}");
    // Two clients may not share a key, whichever way it is given.
    let e = load(&format!(
        "{GENESYS}\n[[client]]\nname = \"c\"\nkey_sha256 = \"{a}\"\n[[client]]\nname = \"d\"\nkeys = [{{ sha256 = \"{a}\" }}]\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("same key"), "{e}");
}

#[test]
fn jwt_callers_need_every_part_and_keys_over_https() {
    let client = |lines: &str| load(&format!("{GENESYS}\n[[client]]\nname = \"ci\"\n{lines}\n"));
    let whole = "jwt_issuer = \"https://token.actions.githubusercontent.com\"\njwt_audience = \"tokengate\"\njwt_subject = \"repo:org/app:*\"\n";
    let c = client(&format!(
        "{whole}jwks_url = \"https://token.actions.githubusercontent.com/.well-known/jwks\""
    ))
    .unwrap();
    let jwt = c.clients[0].jwt.as_ref().unwrap();
    assert!(c.clients[0].keys.is_empty(), "a JWT caller needs no key");
    assert!(jwt.subject_matches("repo:org/app:ref:refs/heads/main"));
    assert!(client(&format!("{whole}jwks_file = \"/etc/tokengate/jwks.json\"")).is_ok());
    assert!(client(&format!("{whole}jwks_url = \"http://127.0.0.1:8081/jwks\"")).is_ok());
    // Neither: the https issuer's discovery document says where its keys are.
    assert!(client(whole).is_ok());
    for (lines, named) in [
        (
            format!("{whole}jwks_url = \"http://idp.example.com/jwks\""),
            "https://",
        ),
        (
            whole.replace("https://token.actions.githubusercontent.com", "github"),
            "jwks_url",
        ),
        (
            format!("{whole}jwks_url = \"https://a/j\"\njwks_file = \"/j\""),
            "not both",
        ),
        (
            "jwt_issuer = \"https://a\"\njwks_file = \"/j\"".to_string(),
            "jwt_audience",
        ),
    ] {
        let e = client(&lines).unwrap_err().to_string();
        assert!(e.contains(named), "{lines}: {e}");
    }
    // A bad CA file for the keys is named by the key it was given as.
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let e = client(&format!(
        "{whole}jwks_url = \"https://a/j\"\njwks_ca_file = \"{}\"",
        not_pem.display()
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("client \"ci\".jwks_ca_file: ") && e.contains("holds no PEM certificate"),
        "{e}"
    );
}
