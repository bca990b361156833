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
        c.upstreams[0].grant.client_secret.expose_secret(),
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
